"""The ingress's client-facing API, built per replica by `app.build_api(ApiDeps)`.

One module per resource: `health`, `detect` (and the `Detectors` it shares with gRPC),
`jobs`, `streams` (streams, their events, camera images), `records`, `events` (SSE) and
`ws` (the WebSocket routes; `ws_session` runs a connection, `ws_protocol` its messages).
`grpc` holds the gRPC methods the Ingress delegates to, `auth` the bearer token, `state`
the replica's cached figures, and `errors` the one table from errors to HTTP status,
WebSocket answer and gRPC code.
"""
