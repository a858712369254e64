"""`synthetic://` dataset URIs: generated once into the cache, deterministic, errors name the URI."""

from __future__ import annotations

import pytest

from medmo_trainer.data.records import DatasetUnavailableError, iter_records
from medmo_trainer.data.shards import open_dataset


def test_synthetic_uri_is_generated_once_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMO_CACHE", str(tmp_path))
    uri = "synthetic://heldout?n=6&seed=5"

    first = [r.model_dump() for r in iter_records(uri)]
    shards = [shard.uri for shard in open_dataset(uri).shards]
    second = [r.model_dump() for r in iter_records(uri)]

    assert first == second and len(first) >= 6
    assert all(str(tmp_path) in shard for shard in shards)
    assert {r["task"] for r in first} == {"caption", "vqa", "report", "retrieval", "grounding"}


@pytest.mark.parametrize("uri", ["synthetic://validation?n=4", "synthetic://train?n=four", "synthetic://train?size=4"])
def test_bad_synthetic_uri_is_a_dataset_error_naming_the_uri(uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMO_CACHE", str(tmp_path))

    with pytest.raises(DatasetUnavailableError) as error:
        open_dataset(uri)

    assert uri in str(error.value)
