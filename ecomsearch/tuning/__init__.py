"""Fine-tuning the bi-encoder: low-rank adapters (`lora`), the model they adapt
(`sentence_encoder`) and the `train-encoder` loop (`bi_encoder`). PyTorch is imported only here
and in the export tooling, never by the served models."""
