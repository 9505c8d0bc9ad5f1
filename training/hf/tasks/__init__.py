"""lm-eval tasks shipped with gpthf (``gpthf lm-eval`` puts this folder on --include_path)."""
