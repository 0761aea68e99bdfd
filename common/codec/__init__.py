"""The codec: the only place in ``common`` that imports Flower; it owns every record key.

- :mod:`common.codec.records`: fedlora's plain types ↔ Flower ``RecordDict`` on the Message API (every message).
- :mod:`common.codec.secure_records`: the legacy ``FitRes`` around a node's summands on the SecAgg+ path.
"""
