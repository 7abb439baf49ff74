"""Where other tools meet the package: the Hugging Face Hub (:mod:`.hub`) and lm-evaluation-harness
(:mod:`.lm_eval`). Nothing in the library layers below (tuner, models, data, training, evaluation,
analysis, extension) imports from here.
"""
