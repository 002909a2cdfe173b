"""B-Coder (`algorithm`: bcoder, bcoder_optimality, dueling_dqn): the dueling Q-model over an LM (`q_model`),
the frozen per-token targets (`targets`), the stage losses (`losses`) and the R̃ ranker (`ranking`)."""
