"""A stand-in for the hub in tests: ``record_uploads(monkeypatch)`` replaces ``HfApi.create_repo`` and
``HfApi.upload_folder`` (what ``tools.model_card.upload_to_hub`` calls) by recorders, so no test reaches the network
and each can assert exactly which files went to which repo with which commit message."""
from pathlib import Path


def record_uploads(monkeypatch):
    """The list the calls are recorded in: ``("create_repo", repo, kwargs)`` and ``("upload_folder", repo,
    {path in the repo: file bytes}, commit message)`` (the staging folder is gone after the call)."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, repo_type, commit_message, **kwargs):
        assert repo_type == "model" and not kwargs, kwargs
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        calls.append(("upload_folder", repo_id, files, commit_message))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls
