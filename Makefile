# redisecho: the two set-up commands are `go -C example run .` and `make test`.
# Every target works on a fresh Debian/Ubuntu machine with Go 1.26: what is
# missing (redis-server, Node.js and npm, wrk) is installed with apt-get.

SHELL := /bin/bash
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# A count, not a duration: with a duration, Go up to 1.26 can fail a fuzzer
# that found nothing with "context deadline exceeded" at the end of its time
# (golang/go#75804, seen here on FuzzLimiterKeys under load).
FUZZTIME ?= 10000x
FUZZERS := FuzzGroupKeysShareSlot FuzzDecodeCookieNeverPanics FuzzDecodeEntryNeverPanics FuzzJSONCodecMatchesEncodingJSON FuzzLimiterKeys FuzzDecodeStreamID

.PHONY: test redis-server node wrk fmt deps vet staticcheck unit fuzz build bench e2e

## test: everything CI runs (installs redis-server, Node.js and npm when
## missing: the Express migration tests run the real express-session and
## connect-redis, installed with `npm ci` from internal/expressapp's lock).
test: redis-server node fmt deps vet staticcheck unit fuzz build e2e

redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@redis-server --version

node:
	@{ command -v node && command -v npm; } >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	@node --version

wrk:
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

fmt:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

# The OpenTelemetry bridge, the example, the benchmarks and the browser test
# are modules of their own (otel/, example/, bench/, e2e/), so that users of
# redisecho never download what only they need: each target runs in all five.
MODULES := otel example bench e2e

## deps: the library's go.mod requires none of what only the bridge, the
## example, the benchmarks or the browser test need, and a build of the
## library compiles none of it (echo-contrib, a test dependency, brings
## client_golang into the module graph; nothing of it is built).
FOREIGN := opentelemetry|prometheus|chromedp|miniredis|hibiken/asynq|go-redis|alexedwards/scs|boj/redistore
deps:
	@bad=$$(grep -E '$(FOREIGN)' go.mod; go list -deps . | grep -E '$(FOREIGN)'); \
	if [ -n "$$bad" ]; then echo "the library must not need:"; echo "$$bad"; exit 1; fi; echo "deps: go.mod and the library's build are free of $(FOREIGN)"

vet:
	go vet ./...
	@for m in $(MODULES); do echo "go vet ($$m)"; (cd $$m && go vet ./...) || exit 1; done

staticcheck:
	go run $(STATICCHECK) ./...
	@for m in $(MODULES); do echo "staticcheck ($$m)"; (cd $$m && go run $(STATICCHECK) ./...) || exit 1; done

## unit: the whole suite with the race detector, on a standalone server and a
## 3-master cluster that the tests start themselves: the library's (with the
## fuzz seed corpus), then the example's, which runs the app on both, then
## the benchmarks' own tests (tiny smoke runs of the realtime and queue benchmarks).
unit:
	go test -race -count=1 ./...
	cd otel && go test -race -count=1 ./...
	cd example && go test -race -count=1 ./...
	cd bench && go test -count=1 ./...

## fuzz: a short run of each fuzzer beyond its seed corpus (which `unit`
## already runs): key slots, cookies, stored cache entries, the JSON codec,
## rate-limit keys, stream IDs.
fuzz:
	@for f in $(FUZZERS); do echo "fuzz $$f"; go test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) . || exit 1; done

build:
	cd example && go build -o /dev/null .
	cd bench && go build -o /dev/null .
	cd e2e && go test -c -o /dev/null .

## bench: the performance table of the README (wrk -t1 -c32 -d5s, two
## interleaved rounds, medians as ratios to a baseline route).
bench: redis-server wrk
	cd bench && go run .

## e2e: the example's demo page in headless Chromium (Debian's chromium,
## installed when missing) against two instances of the example sharing one
## redis-server, which the test starts and stops itself.
e2e: redis-server
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	cd e2e && go test -count=1 ./...

## bench-realtime: the realtime table of the README (issue 11's Performance
## section: servers, publisher and load tool in separate processes; about
## 7 minutes). `cd bench && go run . realtime -quick` is a smoke run.
.PHONY: bench-realtime
bench-realtime: redis-server
	cd bench && go run . realtime

## bench-jobs: the queue table of the README (issue 12: drain, enqueue and
## pickup latency against asynq v0.26, three interleaved rounds; about 11
## minutes, most of it asynq's one-second pickups). `cd bench && go run
## . jobs -quick` is a smoke run.
.PHONY: bench-jobs
bench-jobs: redis-server
	cd bench && go run . jobs -rounds 3
