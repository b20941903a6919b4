"""Privacy math both sides use: the record-level accountant and ledger, and the SecAgg+
quantization that distributed DP rides on. Pure: no Flower."""
