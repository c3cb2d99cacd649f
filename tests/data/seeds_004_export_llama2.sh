python src/export_model.py \
    --model_name_or_path meta-llama/Llama-2-13b-chat-hf \
    --template llama2 \
    --finetuning_type lora \
    --quantization_bit 4 \
    --checkpoint_dir trained_model_sft \
    --export_dir trained_model_output
