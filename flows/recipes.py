"""Stage name -> the recipe function that computes it, by reference: grep and an editor find every caller.

Imported only when a stage computes (flows/stages.py), so planning, cached runs and the light CLI never import
torch. flows/registry.py reads this table from its source to hash the code each recipe reaches
(storage/hashing.table_modules); tests/test_storage.py checks the two views agree.
"""

from creditflow.tasks.recipes import audit, curate, evaluate, onpolicy, policy, reward_model, rl, token_rewards

RECIPES = {
    "curate": curate.compute_curate,
    "reward_model": reward_model.compute_reward_model,
    "onpolicy": onpolicy.compute_onpolicy,
    "token_rewards": token_rewards.compute_token_rewards,
    "policy": policy.compute_policy,
    "rl": rl.compute_rl,
    "evaluate": evaluate.compute_evaluate,
    "audit": audit.compute_audit,
}
