"""Measuring policies: pass@k and ranked metrics with intervals (`metrics`), candidate files and their metrics
(`evaluate`), paired comparisons (`report`), rankers side by side (`rankers`), Figure 1 curves (`plots`),
off-policy reuse of a buffer (`reuse`)."""
