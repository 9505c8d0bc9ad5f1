"""Models that leave the pipeline: the Hugging Face format (``folder``), the ``transformers``
classes written into it (``hf_model``), and the lm-evaluation-harness model (``lm_eval_model``).

``transformers`` and ``lm-eval`` are the optional extra ``.[hf]``; nothing else in gpthf
imports this package.
"""
