"""Fine-tuning: LoRA adapters (lora.py), instruction SFT (sft.py), sequence classification (classify.py),
their data (data.py) and what the recipes share (recipe.py). All of them train through the one loop in
``lmforge.train.loop``."""
