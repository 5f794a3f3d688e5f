"""Pipeline recipes (YAML). Installed as package data so `creditflow demo` finds its configs outside a checkout."""
