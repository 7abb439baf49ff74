"""Where other tools meet the package: the Hugging Face Hub (:mod:`.hub`), lm-evaluation-harness
(:mod:`.lm_eval`) and TRL's SFTTrainer (:mod:`.trl`). Nothing in the library layers below (tuner, models,
data, training, evaluation, analysis, extension) imports from here.
"""
