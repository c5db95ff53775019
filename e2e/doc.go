// Package e2e holds the browser test of the example app: its demo page in
// headless Chromium (Debian's chromium package; `make e2e` installs it when
// missing) against two instances of the example, built from ../example and
// run as processes of their own, sharing one Redis deployment: a standalone
// redis-server, then a 3-master cluster, started on free loopback ports by
// the suite's harness (internal/redistest; the module's path lies inside
// redisecho's, so Go lets it import the harness). It is a module of its
// own, as bench/ is, so that chromedp never reaches the go.sum of
// redisecho's users.
package e2e
