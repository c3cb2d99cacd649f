python src/export_model.py \
    --model_name_or_path mistralai/Mixtral-8x7B-Instruct-v0.1 \
    --template mistral \
    --finetuning_type lora \
    --quantization_bit 4 \
    --checkpoint_dir trained_model_sft \
    --export_dir trained_model_output
