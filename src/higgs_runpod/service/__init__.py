"""The speech service both fronts call: a validated request in, audio bytes and metadata out.

    planning  request -> GenerationPlan: chunks, voices, every check before generation,
              the reference clips' codes
    speech    SpeechService: speak (whole audio), stream (pieces, then a summary),
              generate (codes, for the WebSocket's segments)
    results   what they hand back (Speech, Piece, StreamEnd), the response's metadata,
              progress counts, the whole-file encoder
    deadline  REQUEST_TIMEOUT_S around a call or a stream

The fronts (fronts/) only parse, call, and put the result in their wire shape.
"""
