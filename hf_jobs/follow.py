"""`layerline pkg job status|logs JOB`: follow a build job through huggingface_hub's Jobs API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from layerline.packager.publish import hub_errors

from .job import JOB_HINTS

if TYPE_CHECKING:
    from huggingface_hub import HfApi, JobInfo

FOLLOW_HINTS = {**JOB_HINTS, 404: "check the job id and --namespace (`hf jobs ps -a` lists your jobs)"}


def job_status(job_id: str, *, namespace: str | None = None, api: HfApi | None = None) -> JobInfo:
    """The job's state as the Jobs API reports it (stage, message, flavor, times)."""
    api = api or _api()
    with hub_errors(f"inspecting job {job_id}", FOLLOW_HINTS):
        return api.inspect_job(job_id=job_id, namespace=namespace)


def job_logs(job_id: str, *, follow: bool = False, tail: int | None = None, namespace: str | None = None,
             api: HfApi | None = None) -> Iterator[str]:
    """The job's log lines so far; with follow, until it ends."""
    api = api or _api()
    with hub_errors(f"fetching the logs of job {job_id}", FOLLOW_HINTS):
        yield from api.fetch_job_logs(job_id=job_id, namespace=namespace, follow=follow, tail=tail)


def describe_job(info: JobInfo) -> list[str]:
    """A few lines for a person: the stage and why, the hardware, the times and where to look."""
    stage = info.status.stage if info.status else "UNKNOWN"
    message = info.status.message if info.status and info.status.message else ""
    moments = (("created", info.created_at), ("started", info.started_at), ("finished", info.finished_at))
    times = [f"{name} {at:%Y-%m-%d %H:%M:%S %Z}".strip() for name, at in moments if at]
    return [f"job {info.id}: {stage}" + (f" ({message})" if message else ""),
            f"flavor {info.flavor}" + (f", {', '.join(times)}" if times else ""),
            info.url]


def _api() -> HfApi:
    import huggingface_hub

    return huggingface_hub.HfApi()
