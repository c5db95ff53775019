package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"sync/atomic"
	"testing"
	"time"
)

// TestExpectScript runs wrk with the expectScript of 429 against a server
// that answers 429, and then one that also answers some 500s and 200s: the
// script must count exactly the responses that are not 429 (at most those
// the server sent, since wrk drops responses still in flight at the end).
func TestExpectScript(t *testing.T) {
	if testing.Short() {
		t.Skip("runs wrk")
	}
	bin, err := wrkPath()
	if err != nil {
		t.Skip(err)
	}
	script, err := wrkScript(http.MethodGet, http.StatusTooManyRequests)
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(script)

	var n, odd atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := n.Add(1)
		switch {
		case r.URL.Path == "/mixed" && i%50 == 0:
			odd.Add(1)
			w.WriteHeader(http.StatusInternalServerError)
		case r.URL.Path == "/mixed" && i%50 == 25:
			odd.Add(1)
			w.WriteHeader(http.StatusOK)
		default:
			w.WriteHeader(http.StatusTooManyRequests)
		}
	}))
	defer srv.Close()

	o := options{duration: time.Second, conns: 2}
	r, err := runWrk(context.Background(), bin, wrkArgs(o, srv.URL+"/all", nil, script), http.StatusTooManyRequests)
	if err != nil || r.Requests == 0 || r.Unexpected != 0 || r.broken() {
		t.Fatalf("all 429: %+v, %v", r, err)
	}
	r, err = runWrk(context.Background(), bin, wrkArgs(o, srv.URL+"/mixed", nil, script), http.StatusTooManyRequests)
	t.Logf("mixed: wrk counted %d not 429 (%s) of %d, the server sent %d", r.Unexpected, r.UnexpectedStatuses, r.Requests, odd.Load())
	if err != nil || r.Unexpected == 0 || r.Unexpected > odd.Load() || r.UnexpectedStatuses != "200 500" || !r.broken() {
		t.Fatalf("mixed, server sent %d not 429: %+v, %v", odd.Load(), r, err)
	}
}
