"""Publishing: model cards, checkpoint validation and upload to the Hugging Face Hub."""
