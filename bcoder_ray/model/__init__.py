"""What every algorithm shares about a language model: loading (`lm`: a published policy is a plain `PolicyLM`),
batches (`batch`), prompts and programs as tokens (`tokenization`), sampling with a KV cache (`sampling`,
`vllm_sampling`), the path from problems to scored candidates (`candidates`), the `Ranker` type (`ranker`) and the
warm start of the embedded default (`warm_start`), GGUF files and packaged checkpoints as Hugging Face folders
(`gguf`). No algorithm family here."""
