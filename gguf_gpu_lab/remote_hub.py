"""``hf://ORG/REPO/FILE.gguf[@REVISION]``: a file on the Hugging Face Hub, through
``huggingface_hub`` (its token, its ``HF_ENDPOINT``, its URL for a file and its errors), resolved
to a commit at open and then read in ranges by an ``HTTPSource`` at that commit."""

from __future__ import annotations

import os

from .errors import GGUFLabError, RemoteError, RemoteNotFoundError, SourceChangedError
from .remote import HTTPSource, redact

_HTTP_CLIENTS = ("httpx", "httpx2", "requests", "urllib3")  # whichever the installed huggingface_hub uses
_OFFLINE = "; a file already in the Hugging Face cache opens with HF_HUB_OFFLINE=1"


def parse_hf(url: str) -> tuple[str, str, str | None]:
    """``hf://ORG/REPO/PATH/FILE.gguf[@REVISION]`` as (repo id, file, revision or None)."""
    rest = url[len("hf://"):]
    rev = None
    if "@" in rest:
        rest, rev = rest.rsplit("@", 1)
        if not rev:
            raise GGUFLabError(f"{url}: an empty revision after '@'; name a branch, tag or commit, or leave out the '@'")
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise GGUFLabError(f"{url}: an hf:// URL names ORG/REPO/FILE.gguf (optionally @REVISION)")
    return "/".join(parts[:2]), "/".join(parts[2:]), rev


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``), read now."""
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:  # an older huggingface_hub
        return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return is_offline_mode()


def offline_file(url: str) -> str:
    """The Hugging Face cache's copy of ``hf://ORG/REPO/FILE.gguf[@REVISION]`` (its snapshot
    path, as ``hf_hub_download(..., local_files_only=True)`` finds it), for offline mode; a
    ``RemoteError`` when the cache has none."""
    from huggingface_hub import constants, hf_hub_download

    repo, filename, rev = parse_hf(url)
    try:
        return hf_hub_download(repo, filename, revision=rev, local_files_only=True)
    except Exception:  # huggingface_hub's LocalEntryNotFoundError, or whatever it raises there
        raise RemoteError(f"{url}: HF_HUB_OFFLINE is set and the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                          f"has no copy of {filename} at {rev or 'main'}") from None


def hub_source(url: str, token: "str | bool | None" = None) -> HTTPSource:
    """The source of ``hf://ORG/REPO/FILE.gguf[@REVISION]``: resolved to a commit through
    ``huggingface_hub`` (its token unless ``token`` is given, its ``HF_ENDPOINT``), then read in
    ranges at that commit."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub import errors as hfe
    from huggingface_hub.utils import build_hf_headers

    repo, filename, rev = parse_hf(url)
    name = url
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: the hub reads it once, at import
    hint = "; the repository may be gated or private: log in (`hf auth login`) or set HF_TOKEN"
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=rev, endpoint=endpoint), token=token,
                                    endpoint=endpoint)
    except hfe.GatedRepoError:
        raise RemoteError(f"{name}: the repository {repo} is gated: accept its terms on the Hub, then log in "
                          "(`hf auth login`) or set HF_TOKEN") from None
    except (hfe.RepositoryNotFoundError, hfe.RevisionNotFoundError, hfe.EntryNotFoundError) as e:
        what = {"RevisionNotFoundError": f"revision {rev!r}", "RepositoryNotFoundError": f"repository {repo}"}.get(
            type(e).__name__, f"file {filename}")
        extra = hint if type(e).__name__ == "RepositoryNotFoundError" else ""
        raise RemoteNotFoundError(f"{name}: {what} not found{extra}") from None
    except hfe.HfHubHTTPError as e:
        code = getattr(getattr(e, "response", None), "status_code", None)
        raise RemoteError(f"{name}: the Hub answered HTTP {code}{hint if code in (401, 403) else ''}") from None
    except Exception as e:  # the connection itself: an OSError, or the Hub's HTTP client's own error
        if not isinstance(e, OSError) and type(e).__module__.split(".")[0] not in _HTTP_CLIENTS:
            raise
        from huggingface_hub import constants

        raise RemoteError(f"{name}: cannot reach the Hub at {redact(endpoint or constants.ENDPOINT)} "
                          f"({type(e).__name__}){_OFFLINE}") from None
    if not meta.commit_hash:
        raise RemoteError(f"{name}: the Hub gave no commit for the file (no X-Repo-Commit header)")
    # at the commit, not the branch: a push during the load cannot change the bytes
    at_commit = hf_hub_url(repo, filename, revision=meta.commit_hash, endpoint=endpoint)
    src = HTTPSource(at_commit, headers=build_hf_headers(token=token), name=name, hint=hint,
                     identity=("hf", repo, filename, meta.commit_hash, meta.etag, meta.size))
    if meta.size is not None and src.size != meta.size:
        src.close()
        raise SourceChangedError(name, f"the Hub said {meta.size} bytes, the file has {src.size}")
    src.repo, src.filename, src.revision, src.commit, src.etag = repo, filename, rev, meta.commit_hash, meta.etag
    return src
