module github.com/redisecho/redisecho/e2e

go 1.26.0

require (
	github.com/chromedp/chromedp v0.23.0
	github.com/redisecho/redisecho v0.0.0-00010101000000-000000000000
	github.com/stretchr/testify v1.12.1
)

require (
	github.com/chromedp/cdproto v0.159.0 // indirect
	github.com/go-json-experiment/json v0.0.0-20260213210345-44df1a37e875 // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
)

// The harness (internal/redistest) of the repository this module sits in.
replace github.com/redisecho/redisecho => ../
