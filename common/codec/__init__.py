"""The codec: the only place in ``common`` that imports Flower; it owns every record key.

- :mod:`common.codec.records`: fedlora's plain types ↔ Flower ``RecordDict`` on the Message API (every message).
- :mod:`common.codec.secure_records`: the legacy ``FitRes`` around a node's summands on the SecAgg+ path.
- :mod:`common.codec.object_pulls`: Flower's 1-s wait for a message's object that has not arrived, shortened.
"""
