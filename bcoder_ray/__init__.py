"""B-Coder on Ray: a dueling Q over a pretrained code LM, trained off-policy from a Parquet replay buffer."""
