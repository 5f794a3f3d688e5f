"""CreditFlow: preference data to aligned language models with token-level credit assignment."""

__version__ = "0.1.0"
