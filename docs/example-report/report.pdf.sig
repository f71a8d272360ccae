{
  "format": "keyd-report-signature-v1",
  "report_format": "pdf",
  "sha256": "fbf667f4f7cb8898a0c00dfaaf62be5a04e0715e077815af11cb42cb34f8292b",
  "bytes": 138625,
  "generated_at": "2026-12-10T23:41:48Z",
  "since": "2026-12-06T23:21:45Z",
  "until": "2026-12-10T23:41:48Z",
  "key_id": "30847bbd25313708",
  "public_key": "QhGipP6Hcq5g//JzzkqHngTd6xO3mooidtMBcLR6Q3s=",
  "signature": "97HOEZQ2++hVFucuCNdSHMr/m7Lz6xdtAhjBdTruHCHPIm1e5qUc1bXhxgw+r0TWHXMAKUyX2WcSHjc/xaf4BQ=="
}