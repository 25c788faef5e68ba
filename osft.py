"""Orthogonal Subspace Fine-Tuning (OSFT): not implemented yet.

Planned (its own issue): factorise each target linear W = U S V^T by SVD, freeze the top singular subspace that
carries prior knowledge, and train only the complement, projecting every update so that it stays orthogonal to
the frozen subspace, under FSDP2. It will plug in at setup_model.setup_model (wrapping target linears before
sharding) and as an optimizer-step hook, leaving train.py's loop unchanged.
"""
