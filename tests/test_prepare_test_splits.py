"""MSP-Podcast prepare: the test manifest from a list of Split_Set values; the log beside the paper's counts."""
import json

import pytest

from lobes.errors import DataError


def _n(folder, split):
    return len(json.loads((folder / f"{split}.json").read_text()))


def test_test_splits_list_and_paper_counts(load_recipe, mini_corpora, tmp_path, capsys):
    msp = load_recipe("recipes/MSP-Podcast/msp_podcast_prepare.py")
    n1 = mini_corpora.msp_counts["manifest_transcript_only"]["test"]["total"]
    msp.prepare_msp_podcast(mini_corpora.msp, tmp_path / "t2", splits=("test",), test_splits=["Test2"],
                            transcript_only=True, check_audio=False)
    n2 = _n(tmp_path / "t2", "test")
    assert 0 < n2 <= mini_corpora.msp_counts["test2"]
    both = tmp_path / "both"
    msp.prepare_msp_podcast(mini_corpora.msp, both, test_splits=["Test1", "Test2"], transcript_only=True,
                            check_audio=False)
    out = capsys.readouterr().out
    assert _n(both, "test") == n1 + n2
    assert "(test = Test1 + Test2)" in out
    assert f"test: {n1 + n2} utterances [Test1 {n1}, Test2 {n2}] (" in out
    assert "the paper's transcript subset of v1.12: 89,752)" in out
    assert "the paper's transcript subset of v1.12: 25,232)" in out
    assert "the paper's transcript subset of v1.12: 46,366)" in out
    # a single name (string or one-element list) is the same option; a changed list re-prepares
    msp.prepare_msp_podcast(mini_corpora.msp, both, test_splits="Test2", transcript_only=True, check_audio=False)
    assert _n(both, "test") == n2 and "skipping" not in capsys.readouterr().out
    msp.prepare_msp_podcast(mini_corpora.msp, both, test_splits=["Test2"], transcript_only=True, check_audio=False)
    assert "skipping" in capsys.readouterr().out
    for bad in ([], ["Train"], ["Test1", "Test1"], [3]):
        with pytest.raises(DataError, match="test_splits"):
            msp.prepare_msp_podcast(mini_corpora.msp, tmp_path / "bad", test_splits=bad)
    assert not (tmp_path / "bad").exists()
