"""Hugging Face and GGUF interop: load, import and export checkpoints of other toolkits.

    hf.load_hf(DIR)            -> (DecoderLM, Tokenizer | None)   a transformers model directory
    hf.import_hf(DIR, CKPT)    -> CKPT                            the same, written as an lmforge checkpoint
    hf.export_hf(model, tok, DIR)                                 a directory AutoModelForCausalLM loads
    gguf.load_gguf(FILE)       -> (DecoderLM, Tokenizer)          a llama.cpp GGUF file (dequantized)
    gguf.import_gguf(FILE, CKPT) -> CKPT

Nothing heavy is imported here: ``transformers`` is never needed at all, ``gguf`` only inside the GGUF
functions, torch and safetensors only inside the functions that move weights.
"""
