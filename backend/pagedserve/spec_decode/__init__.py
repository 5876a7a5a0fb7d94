"""Speculative decoding (issue 11): the proposers that draft tokens for a request cheaply
(n-gram prompt lookup, a draft model, an EAGLE-3 head), their configuration, and the
bookkeeping the scheduler needs to choose how many tokens to draft. The target model's
verification (the rejection sampler) lives beside the Sampler in worker/.

``ngram_proposer`` (numpy), ``controller`` and ``acceptance`` (numpy) import no torch, so the
scheduler side can call them without torch; ``draft_model``, ``eagle3_proposer`` and
``paged_drafting`` run models and are used by the runner only.
"""
