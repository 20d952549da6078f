"""What patches or steers a loaded model: LoRA (lora_table.py names the patchable modules,
lora_files.py reads and writes the file formats, lora.py applies, overlays and fuses)."""
