{
  "format": "keyd-report-signature-v1",
  "report_format": "html",
  "sha256": "7cf96fbfd251b291150a94ae3808859fb1548ae04ae7abe3e4aedeb1d157b942",
  "bytes": 17513,
  "generated_at": "2026-12-10T23:41:45Z",
  "since": "2026-12-06T23:21:45Z",
  "until": "2026-12-10T23:41:45Z",
  "key_id": "30847bbd25313708",
  "public_key": "QhGipP6Hcq5g//JzzkqHngTd6xO3mooidtMBcLR6Q3s=",
  "signature": "StzAf03NdDa6jguME6hsS0mUTYWNI0rPFMT/UJ/MehK3pHXrf3ljaqvRmmMAy0EqTfe3t0SeVy57EZFlrxzICA=="
}