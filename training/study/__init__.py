"""``gpthf study``: GPTHF against the GPT as the paper compares them (train, evaluate, generate, report)."""
