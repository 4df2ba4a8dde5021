"""A stand-in for the hub in tests: ``record_uploads(monkeypatch)`` replaces ``HfApi.create_repo`` and
``HfApi.create_commit`` (what ``tools.model_card.upload_to_hub`` calls) by recorders, so no test reaches the network
and each can assert exactly which files went to which repo with which commit message."""
from pathlib import Path


def record_uploads(monkeypatch):
    """The list the calls are recorded in: ``("create_repo", repo, kwargs)`` and ``("create_commit", repo,
    {path in the repo: file bytes}, commit message)`` (bytes read at the call, as the hub client reads them)."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, *, commit_message, repo_type, **kwargs):
        assert repo_type == "model" and not kwargs, kwargs
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        assert len(files) == len(operations), "two files for one path in the repo"
        calls.append(("create_commit", repo_id, dict(sorted(files.items())), commit_message))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls
