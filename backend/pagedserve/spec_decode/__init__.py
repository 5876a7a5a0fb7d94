"""Speculative decoding (issue 11): the proposers that draft tokens for a request cheaply
(n-gram prompt lookup today; later a draft model and EAGLE-3 heads), their configuration, and
the bookkeeping the scheduler needs to choose how many tokens to draft. The target model's
verification (the rejection sampler) lives beside the Sampler in worker/.

Nothing in the engine calls this package yet; ``ngram_proposer`` imports numpy only, so the
scheduler side can call it without torch.
"""
