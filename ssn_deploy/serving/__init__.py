"""Serving with NVIDIA Triton: the model repository, the server and a client.

:func:`~ssn_deploy.serving.repository.build_repository` writes a repository from a model's own
metadata, :class:`~ssn_deploy.serving.server.TritonServer` runs ``tritonserver`` on it (its
environment set up by :mod:`~ssn_deploy.serving.environment`), and
:class:`~ssn_deploy.serving.client.TritonClient` sends batches to it. Submodules are imported
on use, so ``import ssn_deploy.serving`` stays cheap and needs no tritonclient.
"""
