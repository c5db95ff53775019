package main

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/require"

	"github.com/redisecho/redisecho/internal/redistest"
)

// scrape reads GET /metrics with the exposition-format parser Prometheus
// uses, and returns the families by name.
func scrape(t *testing.T, base string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	return fams
}

// metricValue returns the value of family name's sample whose labels
// include labels ("k=v" each), summed over the samples that match, and
// whether any did. Histograms give their sample count.
func metricValue(fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
	var sum float64
	found := false
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		match := true
		for _, kv := range labels {
			k, v, _ := strings.Cut(kv, "=")
			match = match && have[k] == v
		}
		if !match {
			continue
		}
		found = true
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return sum, found
}

func familyNames(fams map[string]*dto.MetricFamily) string {
	var names []string
	for n := range fams {
		if strings.HasPrefix(n, "redisecho") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return strings.Join(names, "\n")
}

// requireMetric requires family name's matching samples to sum to want.
func requireMetric(t *testing.T, fams map[string]*dto.MetricFamily, want float64, name string, labels ...string) {
	t.Helper()
	got, ok := metricValue(fams, name, labels...)
	require.True(t, ok, "no sample of %s%v; the families are:\n%s", name, labels, familyNames(fams))
	require.Equal(t, want, got, "%s%v", name, labels)
}

// TestMetrics: after known traffic, /metrics says what happened: cache
// hits, rate-limit denials, jobs completed, open SSE connections, with the
// Redis calls, the breaker state and the queue depth beside them.
func TestMetrics(t *testing.T) {
	forEachTopology(t, func(t *testing.T, redisURL string) {
		base := startReady(t, jobsEnv(redisURL, "2"))
		ips := newClientIPs()
		anon := visitor(t, base, ips)

		const hits = 4
		for i := range hits + 1 {
			code, h, _ := anon.request(http.MethodGet, "/api/products", "")
			require.Equal(t, http.StatusOK, code)
			require.Equal(t, map[bool]string{true: "MISS", false: "HIT"}[i == 0], h.Get("X-Cache"))
		}

		// The login limiter counts failures: five are let through, then
		// every attempt is refused.
		const denials = 3
		guesser := visitor(t, base, ips)
		for i := range 5 + denials {
			code, _ := guesser.call(http.MethodPost, "/login", `{"username":"alice","password":"guess"}`)
			require.Equal(t, map[bool]int{true: http.StatusUnauthorized, false: http.StatusTooManyRequests}[i < 5], code, "attempt %d", i+1)
		}

		const jobs = 3
		bob := member(t, base, "bob", ips)
		for i := range jobs {
			id := sendEmail(t, bob, fmt.Sprintf("user%d@example.com", i))
			waitJob(t, bob, id, "completed", 20*time.Second)
		}

		streams := []*sseStream{anon.stream("rooms=lobby", ""), bob.stream("rooms=lobby", "")}
		for _, s := range streams {
			<-s.opened
		}

		fams := scrape(t, base)
		requireMetric(t, fams, hits, "redisecho_cache_requests_total", "redisecho_result=hit")
		requireMetric(t, fams, 1, "redisecho_cache_requests_total", "redisecho_result=miss")
		requireMetric(t, fams, denials, "redisecho_ratelimit_decisions_total", "redisecho_ratelimit_limiter=auth", "redisecho_result=denied")
		requireMetric(t, fams, jobs, "redisecho_jobs_completed_total", "messaging_destination_name=emails")
		requireMetric(t, fams, jobs, "redisecho_jobs_enqueued_total", "messaging_destination_name=emails")
		requireMetric(t, fams, jobs, "redisecho_jobs_duration_seconds", "messaging_destination_name=emails", "redisecho_result=completed")
		requireMetric(t, fams, jobs, "redisecho_jobs_depth", "messaging_destination_name=emails", "redisecho_job_state=completed")
		requireMetric(t, fams, 0, "redisecho_jobs_depth", "messaging_destination_name=emails", "redisecho_job_state=pending")
		requireMetric(t, fams, 2, "redisecho_realtime_connections")
		calls, ok := metricValue(fams, "redisecho_redis_call_duration_seconds", "redisecho_feature=session")
		require.True(t, ok && calls > 0, "session round trips are timed")
		requireMetric(t, fams, 0, "redisecho_redis_breaker_state") // every node closed
		_, ok = metricValue(fams, "go_goroutines")
		require.True(t, ok, "the Go runtime's metrics are there too")

		streams[0].close()
		require.Eventually(t, func() bool {
			v, _ := metricValue(scrape(t, base), "redisecho_realtime_connections")
			return v == 1
		}, 5*time.Second, 50*time.Millisecond, "a closed stream leaves the gauge")
	})
}

// TestMetricsWhileRedisDown: /metrics answers from process memory while
// Redis is stopped, promptly, with what it counted before.
func TestMetricsWhileRedisDown(t *testing.T) {
	forEachFaultTopology(t, func(t *testing.T, tp *redistest.Topology) {
		base := startReady(t, jobsEnv(tp.URL(), "1"))
		anon := newClient(t, base)
		anon.forwardedFor = newClientIPs().ip()
		for range 3 {
			code, _, _ := anon.request(http.MethodGet, "/api/products", "")
			require.Equal(t, http.StatusOK, code)
		}
		tp.StopServers()
		for range 2 {
			start := time.Now()
			fams := scrape(t, base)
			require.Less(t, time.Since(start), 2*time.Second, "a scrape does not wait on Redis")
			requireMetric(t, fams, 2, "redisecho_cache_requests_total", "redisecho_result=hit")
			_, ok := metricValue(fams, "redisecho_jobs_depth")
			require.False(t, ok, "the queue depth is left out when Redis does not answer")
		}
	})
}
