"""Notifications of prioritised studies: a signed JSON webhook and an HL7 v2.5 ORU^R01 over MLLP.

- `document`: the one document per analysed study and the rules that pick its targets.
- `webhook`: HTTP POST with an HMAC-SHA256 signature header.
- `hl7`: ORU^R01 built and parsed with the `hl7` library, MLLP framing, ACK codes.
- `outbox`: the background loop delivering pending notification rows with retries and dead letters.
"""
