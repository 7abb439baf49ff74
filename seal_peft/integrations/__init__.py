"""Where other tools meet the package: the Hugging Face Hub (:mod:`.hub`), lm-evaluation-harness
(:mod:`.lm_eval`), TRL's SFTTrainer (:mod:`.trl`) and GGUF files for llama.cpp / Ollama (:mod:`.gguf_export`). Nothing in the library layers below (tuner, models,
data, training, evaluation, analysis, extension) imports from here.
"""
