"""Hub model card templates, shipped as package data (`deepseek_vl_hf.model_cards`)."""
