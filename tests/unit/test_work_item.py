from pathlib import Path

from cacovid_rl.data.records import QARecord
from cacovid_rl.rl.worker import WorkItem
from cacovid_rl.wire import packb, unpackb


def test_record_survives_the_trip_to_an_actor():
    rec = QARecord(
        sample_id="q-7",
        problem="What colour are the dots in the pink box ?\nA. red\nB. green",
        answer="B",
        solution="<answer>B</answer>",
        problem_type="multiple choice",
        video=Path("/data/videos/x.mp4"),
        options=("A. red", "B. green"),
        data_source="synthetic/colour",
    )
    raw = unpackb(packb(WorkItem.record_to_dict(rec)))  # as msgpack carries it to the actor
    assert WorkItem(3, 1, 0, raw).to_record() == rec
