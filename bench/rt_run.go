package main

// The realtime benchmark (`go run . realtime`): the Performance
// section. See README.md, "Realtime", for the method.

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// rtPlan is the shape of a realtime run. fullPlan is the method; the
// others are smoke runs whose figures are not comparable.
type rtPlan struct {
	Name          string
	Rounds        int
	Rooms         int     // rooms of the rooms cases and the ceiling
	PerRoom       int     // subscribers per room, split over both servers
	BigRoom       int     // subscribers of the one big room
	RoomRates     []int   // publishes/s of the rooms cases
	BigRate       int     // publishes/s into the big room
	Warmup        float64 // seconds published before the measured window
	Duration      float64 // seconds of the measured window
	Drain         float64 // seconds waited after the last publish
	CeilingRates  []int   // the ceiling's steps, publishes/s
	CeilingWarmup float64
	CeilingDur    float64
	CeilingP99    float64 // ms: a step holds while its p99 is at most this
	Idle          int     // idle streams of the memory case
}

var (
	fullPlan = rtPlan{
		Name: "full", Rounds: 2, Rooms: 100, PerRoom: 10, BigRoom: 1000,
		RoomRates: []int{100, 1000}, BigRate: 100,
		Warmup: 2, Duration: 10, Drain: 1,
		CeilingRates:  []int{1000, 1500, 2000, 3000, 4000, 5000, 6500, 8000, 10000, 13000, 16000, 20000},
		CeilingWarmup: 1, CeilingDur: 4, CeilingP99: 50,
		Idle: 10000,
	}
	quickPlan = rtPlan{
		Name: "quick", Rounds: 1, Rooms: 20, PerRoom: 10, BigRoom: 200,
		RoomRates: []int{100, 1000}, BigRate: 100,
		Warmup: 0.5, Duration: 2, Drain: 0.5,
		CeilingRates:  []int{1000, 2000, 4000, 8000},
		CeilingWarmup: 0.5, CeilingDur: 1, CeilingP99: 50,
		Idle: 1000,
	}
	// tinyPlan is what the go test runs.
	tinyPlan = rtPlan{
		Name: "tiny", Rounds: 1, Rooms: 3, PerRoom: 2, BigRoom: 10,
		RoomRates: []int{50}, BigRate: 50,
		Warmup: 0.3, Duration: 0.5, Drain: 0.3,
		CeilingRates:  []int{100, 200},
		CeilingWarmup: 0.2, CeilingDur: 0.3, CeilingP99: 50,
		Idle: 50,
	}
)

// rtSystem is one system under test with its processes.
type rtSystem struct {
	Name      string // "redisecho" or "centrifuge"
	Transport string // for the table
	Client    string // the load tool's connect kind
	servers   []*child
	addrs     []string
	publisher *child
}

// rtResult is one measured run of one system.
type rtResult struct {
	Rate        float64 // target publishes/s
	Achieved    float64 // publishes/s the publisher reached
	Delivered   float64 // measured events received per second
	Expected    uint64  // measured events that should have arrived
	Received    uint64
	Disconnects uint64
	BadEvents   uint64
	PubErrors   uint64
	PubErr      string
	Lat         latencyReport
	CPUPerEvent float64 // load tool CPU µs per event received
	SrvPerEvent float64 // both servers' CPU µs per event received
	CmdsPerPub  float64
	ByCommand   map[string]float64 // Redis calls per publish, by command
	Profile     string
}

func (r rtResult) problems() []string {
	var p []string
	if r.Received != r.Expected {
		p = append(p, fmt.Sprintf("received %d of %d measured events", r.Received, r.Expected))
	}
	if r.Disconnects > 0 {
		p = append(p, fmt.Sprintf("%d subscribers disconnected", r.Disconnects))
	}
	if r.BadEvents > 0 {
		p = append(p, fmt.Sprintf("%d unparsable events", r.BadEvents))
	}
	if r.PubErrors > 0 {
		p = append(p, fmt.Sprintf("%d publish errors (first: %s)", r.PubErrors, r.PubErr))
	}
	if r.Achieved < 0.95*r.Rate {
		p = append(p, fmt.Sprintf("publisher reached %.0f/s of %.0f/s", r.Achieved, r.Rate))
	}
	return p
}

// rtCase is one row kind: its subscribers and publish rate.
type rtCase struct {
	Name     string
	Channels []string
	PerRoom  int
	Rate     int
	Ceiling  bool
}

// rtMem is one memory measurement.
type rtMem struct {
	PerStream, Heap, Stack, Goroutines float64
	Sites                              map[string]float64 // bytes per stream
	Parked                             map[string]float64 // goroutines per stream by where they wait
	Retries                            uint64             // stream requests answered 503 while opening them
	Problem                            string
}

type rtOptions struct {
	plan       rtPlan
	redis      string
	cases      *regexp.Regexp
	systems    []string
	cpuprofile string
}

func realtimeMain(args []string) error {
	fs := flag.NewFlagSet("realtime", flag.ContinueOnError)
	quick := fs.Bool("quick", false, "smoke run: fewer subscribers, shorter runs, one round (figures not comparable)")
	redisAddr := fs.String("redis", "", "address of an existing Redis (default: start a throwaway redis-server)")
	pattern := fs.String("cases", "", "regexp selecting cases by name (rooms, big room, ceiling, memory)")
	systems := fs.String("systems", "redisecho,centrifuge", "systems to run, comma-separated")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile of one redisecho server during its first rooms run at 1,000 publishes/s to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	re, err := regexp.Compile(*pattern)
	if err != nil {
		return fmt.Errorf("-cases: %w", err)
	}
	o := rtOptions{plan: fullPlan, redis: *redisAddr, cases: re, systems: strings.Split(*systems, ","), cpuprofile: *cpuprofile}
	if *quick {
		o.plan = quickPlan
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	broken, err := runRealtime(ctx, o, os.Stdout)
	if err != nil {
		return err
	}
	if broken > 0 {
		fmt.Fprintf(os.Stderr, "bench: %d realtime row(s) had errors; see the notes under the table\n", broken)
		os.Exit(1)
	}
	return nil
}

// runRealtime runs the plan and writes the tables to w; it returns the
// number of rows with errors.
func runRealtime(ctx context.Context, o rtOptions, w io.Writer) (int, error) {
	if err := raiseFileLimit(); err != nil {
		return 0, fmt.Errorf("RLIMIT_NOFILE: %w", err)
	}
	p := o.plan
	redisAddr, redisKind, stopRedis, err := useRedis(ctx, o.redis)
	if err != nil {
		return 0, err
	}
	defer stopRedis()
	info, err := dialRedis(redisAddr)
	if err != nil {
		return 0, fmt.Errorf("redis %s: %w", redisAddr, err)
	}
	defer info.Close()
	redisVersion, err := info.serverVersion()
	if err != nil {
		return 0, fmt.Errorf("redis %s: %w", redisAddr, err)
	}
	prefix := "bench:rt:"
	loadStart := loadAverage()

	var children []*child
	defer func() {
		for i := len(children) - 1; i >= 0; i-- {
			children[i].Stop()
		}
	}()
	start := func(name, sub string, args []string, ready any) (*child, error) {
		c, err := startChild(name, sub, args, ready)
		if err != nil {
			return nil, err
		}
		children = append(children, c)
		return c, nil
	}

	var systems []*rtSystem
	for _, name := range o.systems {
		s := &rtSystem{Name: name}
		switch name {
		case "redisecho":
			s.Transport, s.Client = "SSE, raw HTTP/1.1", "sse"
		case "centrifuge":
			s.Transport, s.Client = "WebSocket, centrifuge-go", "centrifuge"
		default:
			return 0, fmt.Errorf("-systems: unknown system %q", name)
		}
		if serverKinds[name] == nil {
			return 0, fmt.Errorf("system %s is not built into this binary", name)
		}
		for i := 0; i < 2; i++ {
			var ready serverReady
			c, err := start(fmt.Sprintf("%s server %c", name, 'A'+i), "rt-server", []string{"-kind", name, "-redis", redisAddr, "-prefix", prefix}, &ready)
			if err != nil {
				return 0, err
			}
			s.servers, s.addrs = append(s.servers, c), append(s.addrs, ready.Addr)
			logf("%s server %c pid %d on %s", name, 'A'+i, ready.Pid, ready.Addr)
		}
		c, err := start(name+" publisher", "rt-publish", []string{"-kind", name, "-redis", redisAddr, "-prefix", prefix}, nil)
		if err != nil {
			return 0, err
		}
		s.publisher = c
		systems = append(systems, s)
	}
	load, err := start("load tool", "rt-load", nil, nil)
	if err != nil {
		return 0, err
	}
	logf("load tool pid %d", load.Pid())

	rooms := func(n int) []string {
		chs := make([]string, n)
		for i := range chs {
			chs[i] = fmt.Sprintf("room-%03d", i)
		}
		return chs
	}
	var cases []rtCase
	for _, rate := range p.RoomRates {
		cases = append(cases, rtCase{Name: fmt.Sprintf("rooms %d×%d @ %s/s", p.Rooms, p.PerRoom, thousands(float64(rate))), Channels: rooms(p.Rooms), PerRoom: p.PerRoom, Rate: rate})
	}
	cases = append(cases,
		rtCase{Name: fmt.Sprintf("big room 1×%s @ %d/s", thousands(float64(p.BigRoom)), p.BigRate), Channels: []string{"big-room"}, PerRoom: p.BigRoom, Rate: p.BigRate},
		rtCase{Name: fmt.Sprintf("ceiling, rooms %d×%d (p99 ≤ %.0f ms)", p.Rooms, p.PerRoom, p.CeilingP99), Channels: rooms(p.Rooms), PerRoom: p.PerRoom, Ceiling: true},
	)
	var selected []rtCase
	for _, c := range cases {
		if o.cases.MatchString(c.Name) {
			selected = append(selected, c)
		}
	}
	runMemory := o.cases.MatchString("memory")
	if len(selected) == 0 && !runMemory {
		return 0, fmt.Errorf("-cases %q selects no case", o.cases)
	}

	results := map[string][]rtResult{} // case name + system → runs
	key := func(c rtCase, s *rtSystem) string { return c.Name + "\x00" + s.Name }
	profiled := o.cpuprofile == ""
	for round := 1; round <= p.Rounds; round++ {
		for _, c := range selected {
			for _, s := range systems {
				if err := ctx.Err(); err != nil {
					return 0, err
				}
				profile := ""
				if !profiled && s.Name == "redisecho" && !c.Ceiling && c.Rate == 1000 {
					profile, profiled = o.cpuprofile, true
				}
				var r rtResult
				if c.Ceiling {
					r, err = runCeiling(ctx, p, c, s, load, info)
				} else {
					r, err = runCase(p, c, s, load, info, float64(c.Rate), p.Warmup, p.Duration, true, profile)
				}
				if err != nil {
					return 0, fmt.Errorf("%s, %s: %w", c.Name, s.Name, err)
				}
				results[key(c, s)] = append(results[key(c, s)], r)
				logf("round %d/%d %-40s %-10s %8.0f pub/s %9.0f ev/s  p50 %6.2f  p99 %6.2f  max %7.2f ms  CPU/ev %5.1f µs servers %5.1f µs load tool  %5.2f cmds/pub %s",
					round, p.Rounds, c.Name, s.Name, r.Rate, r.Delivered, r.Lat.P50/1000, r.Lat.P99/1000, r.Lat.Max/1000, r.SrvPerEvent, r.CPUPerEvent, r.CmdsPerPub, strings.Join(r.problems(), "; "))
			}
		}
	}

	// Memory per idle stream: a server of its own, nothing else connected.
	mem := map[string][]rtMem{}
	var memKinds []string
	if runMemory {
		for _, k := range []string{"redisecho", "bare"} {
			if serverKinds[k] != nil {
				memKinds = append(memKinds, k)
			}
		}
		for round := 1; round <= p.Rounds; round++ {
			for _, k := range memKinds {
				m, err := runMemoryCase(p, k, redisAddr, prefix, load)
				if err != nil {
					return 0, fmt.Errorf("memory, %s: %w", k, err)
				}
				mem[k] = append(mem[k], m)
				logf("round %d/%d memory %-10s %d idle streams: %.1f KB per stream (heap %.1f KB, stack %.1f KB, %.2f goroutines; %d 503s retried) %s",
					round, p.Rounds, k, p.Idle, m.PerStream/1024, m.Heap/1024, m.Stack/1024, m.Goroutines, m.Retries, m.Problem)
			}
		}
	}

	h := rtHeader{
		Plan: p, Go: runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH, CPUs: runtime.NumCPU(),
		Redis: redisVersion + " (" + redisKind + ")", Date: time.Now().UTC(), Command: realtimeCommandLine(),
		Load: loadStart + " at the start, " + loadAverage() + " at the end",
	}
	return reportRealtime(w, h, selected, systems, results, memKinds, mem), nil
}

// runCase opens the case's subscribers, publishes, and measures; it
// closes them again when close is set.
func runCase(p rtPlan, c rtCase, s *rtSystem, load *child, info *redisConn, rate, warmup, duration float64, closeAfter bool, profile string) (rtResult, error) {
	if closeAfter {
		if err := connectCase(c, s, load); err != nil {
			return rtResult{}, err
		}
		defer func() { _ = load.Call("close", nil, nil) }()
	}
	r, err := measure(p, c, s, load, info, rate, warmup, duration, profile)
	return r, err
}

func connectCase(c rtCase, s *rtSystem, load *child) error {
	var res struct{ Seconds float64 }
	if err := load.Call("connect", connectArgs{Kind: s.Client, Servers: s.addrs, Channels: c.Channels, PerChannel: c.PerRoom}, &res); err != nil {
		return err
	}
	logf("%s, %s: %d subscribers live in %.1fs", c.Name, s.Name, len(c.Channels)*c.PerRoom, res.Seconds)
	// Let the servers settle (subscriptions confirmed, first presence
	// refresh) before the clock starts.
	time.Sleep(500 * time.Millisecond)
	return nil
}

// measure runs one publisher run against the connected subscribers.
func measure(p rtPlan, c rtCase, s *rtSystem, load *child, info *redisConn, rate, warmup, duration float64, profile string) (rtResult, error) {
	// Clear the histogram of anything left over.
	if err := load.Call("latency", nil, nil); err != nil {
		return rtResult{}, err
	}
	var m0, m1 loadMark
	if err := load.Call("mark", nil, &m0); err != nil {
		return rtResult{}, err
	}
	calls0, err := commandCalls(info)
	if err != nil {
		return rtResult{}, err
	}
	if profile != "" {
		if err := s.servers[0].Call("cpuprofile-start", struct{ Path string }{profile}, nil); err != nil {
			return rtResult{}, err
		}
	}
	srvCPU := func() (int64, error) {
		var total int64
		for _, srv := range s.servers {
			var cpu struct{ CPUNanos int64 }
			if err := srv.Call("cpu", nil, &cpu); err != nil {
				return 0, err
			}
			total += cpu.CPUNanos
		}
		return total, nil
	}
	srv0, err := srvCPU()
	if err != nil {
		return rtResult{}, err
	}
	var pub publishResult
	err = s.publisher.Call("run", publishArgs{Channels: c.Channels, Rate: rate, Warmup: warmup, Duration: duration}, &pub)
	if err != nil {
		return rtResult{}, err
	}
	// Drain: at least p.Drain, then until every measured event arrived (or
	// 15 s more), so late events count as late, not as lost.
	expected := pub.Measured * uint64(c.PerRoom)
	time.Sleep(time.Duration(p.Drain * float64(time.Second)))
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if err := load.Call("mark", nil, &m1); err != nil {
			return rtResult{}, err
		}
		if m1.Measured-m0.Measured >= expected {
			break
		}
	}
	if profile != "" {
		if err := s.servers[0].Call("cpuprofile-stop", nil, nil); err != nil {
			return rtResult{}, err
		}
		logf("wrote CPU profile of %s server A (pid %d) to %s", s.Name, s.servers[0].Pid(), profile)
	}
	calls1, err := commandCalls(info)
	if err != nil {
		return rtResult{}, err
	}
	srv1, err := srvCPU()
	if err != nil {
		return rtResult{}, err
	}
	if err := load.Call("mark", nil, &m1); err != nil {
		return rtResult{}, err
	}
	var lat latencyReport
	if err := load.Call("latency", nil, &lat); err != nil {
		return rtResult{}, err
	}
	r := rtResult{
		Rate: rate, Achieved: pub.Achieved,
		Expected: expected, Received: m1.Measured - m0.Measured,
		Disconnects: m1.Disconnects - m0.Disconnects, BadEvents: m1.BadEvents - m0.BadEvents,
		PubErrors: pub.Errors, PubErr: pub.FirstErr, Lat: lat, Profile: profile,
	}
	// Delivered per second of the window as the subscribers saw it: from
	// its start to the last measured event's arrival, at least its planned
	// length (a backlog that drains after the publisher stopped does not
	// count as throughput).
	window := duration
	if pub.WindowStart > 0 && m1.LastNano > pub.WindowStart {
		window = max(window, float64(m1.LastNano-pub.WindowStart)/1e9)
	}
	r.Delivered = float64(r.Received) / window
	if ev := m1.Events - m0.Events; ev > 0 {
		r.CPUPerEvent = float64(m1.CPUNanos-m0.CPUNanos) / 1000 / float64(ev)
		r.SrvPerEvent = float64(srv1-srv0) / 1000 / float64(ev)
	}
	if pub.Published > 0 {
		calls1["info"]-- // the first snapshot
		r.ByCommand = map[string]float64{}
		for cmd, n := range calls1 {
			if d := n - calls0[cmd]; d > 0 {
				r.ByCommand[cmd] = float64(d) / float64(pub.Published)
				r.CmdsPerPub += r.ByCommand[cmd]
			}
		}
	}
	return r, nil
}

// runCeiling raises the rate step by step over one set of subscribers and
// returns the last step that held (p99 within the bound, nothing lost),
// or the first step, flagged, when none did. A step that fails is run
// once more on fresh subscribers (the machine is shared: one noisy second
// should not end the climb); the climb ends when it fails again.
func runCeiling(ctx context.Context, p rtPlan, c rtCase, s *rtSystem, load *child, info *redisConn) (rtResult, error) {
	if err := connectCase(c, s, load); err != nil {
		return rtResult{}, err
	}
	defer func() { _ = load.Call("close", nil, nil) }()
	var held *rtResult
	for _, rate := range p.CeilingRates {
		var r rtResult
		for try := 1; try <= 2; try++ {
			if err := ctx.Err(); err != nil {
				return rtResult{}, err
			}
			if try == 2 {
				if err := load.Call("close", nil, nil); err != nil {
					return rtResult{}, err
				}
				if err := connectCase(c, s, load); err != nil {
					return rtResult{}, err
				}
			}
			var err error
			r, err = measure(p, c, s, load, info, float64(rate), p.CeilingWarmup, p.CeilingDur, "")
			if err != nil {
				return rtResult{}, err
			}
			ok := ceilingHeld(p, r)
			verdict := "held"
			if !ok {
				verdict = fmt.Sprintf("failed (try %d) %s", try, strings.Join(r.problems(), "; "))
			}
			logf("  ceiling %-10s step %6d/s: %9.0f ev/s  p99 %7.2f ms  %s", s.Name, rate, r.Delivered, r.Lat.P99/1000, verdict)
			if ok {
				break
			}
		}
		if !ceilingHeld(p, r) {
			if held == nil {
				return r, nil // flagged by its problems or its p99
			}
			return *held, nil
		}
		held = &r
	}
	return *held, nil
}

func ceilingHeld(p rtPlan, r rtResult) bool {
	return len(r.problems()) == 0 && r.Lat.P99/1000 <= p.CeilingP99
}

// runMemoryCase starts a server of kind alone, opens p.Idle idle streams
// (one room each), and reads its memory after a GC, before and after.
func runMemoryCase(p rtPlan, kind, redisAddr, prefix string, load *child) (rtMem, error) {
	var ready serverReady
	srv, err := startChild(kind+" memory server", "rt-server", []string{"-kind", kind, "-redis", redisAddr, "-prefix", prefix, "-memprofilerate", "512"}, &ready)
	if err != nil {
		return rtMem{}, err
	}
	defer srv.Stop()
	// A first stream warms up what every server allocates once (the hub's
	// subscription connection, pools), so the delta is per stream only.
	warm := rtCase{Channels: []string{"idle-warmup"}, PerRoom: 1}
	if err := load.Call("connect", connectArgs{Kind: "sse", Servers: []string{ready.Addr}, Channels: warm.Channels, PerChannel: 1}, nil); err != nil {
		return rtMem{}, err
	}
	time.Sleep(300 * time.Millisecond)
	var m0, m1 memReport
	if err := srv.Call("mem", nil, &m0); err != nil {
		return rtMem{}, err
	}
	chs := make([]string, p.Idle)
	for i := range chs {
		chs[i] = fmt.Sprintf("idle-%05d", i)
	}
	start := time.Now()
	var before loadMark
	if err := load.Call("mark", nil, &before); err != nil {
		return rtMem{}, err
	}
	if err := load.Call("connect", connectArgs{Kind: "sse", Servers: []string{ready.Addr}, Channels: chs, PerChannel: 1, Concurrency: 32}, nil); err != nil {
		return rtMem{}, err
	}
	logf("memory %s: %d idle streams live in %.1fs", kind, p.Idle, time.Since(start).Seconds())
	time.Sleep(time.Second)
	if err := srv.Call("mem", nil, &m1); err != nil {
		return rtMem{}, err
	}
	var stats struct{ Connections int64 }
	if err := srv.Call("stats", nil, &stats); err != nil {
		return rtMem{}, err
	}
	var mark loadMark
	if err := load.Call("mark", nil, &mark); err != nil {
		return rtMem{}, err
	}
	if err := load.Call("close", nil, nil); err != nil {
		return rtMem{}, err
	}
	n := float64(p.Idle)
	m := rtMem{
		Heap:       (float64(m1.HeapInuse) - float64(m0.HeapInuse)) / n,
		Stack:      (float64(m1.StackInuse) - float64(m0.StackInuse)) / n,
		Goroutines: float64(m1.Goroutines-m0.Goroutines) / n,
		Sites:      map[string]float64{},
		Parked:     map[string]float64{},
	}
	for at, g := range m1.Parked {
		if d := float64(g-m0.Parked[at]) / n; d >= 0.01 {
			m.Parked[at] = d
		}
	}
	m.PerStream = m.Heap + m.Stack
	for site, b := range m1.Sites {
		if d := float64(b-m0.Sites[site]) / n; d != 0 {
			m.Sites[site] = d
		}
	}
	m.Retries = mark.Retries - before.Retries
	switch {
	case mark.Disconnects > 0:
		m.Problem = fmt.Sprintf("%d streams ended during the measurement", mark.Disconnects)
	case kind == "redisecho" && stats.Connections != int64(p.Idle)+1:
		m.Problem = fmt.Sprintf("the hub counts %d streams, want %d", stats.Connections, p.Idle+1)
	}
	return m, nil
}

type rtHeader struct {
	Load    string // the machine's load averages at the start and the end
	Plan    rtPlan
	Go      string
	CPUs    int
	Redis   string
	Date    time.Time
	Command string
}

// reportRealtime prints the tables and returns the number of rows with
// errors.
func reportRealtime(w io.Writer, h rtHeader, cases []rtCase, systems []*rtSystem, results map[string][]rtResult, memKinds []string, mem map[string][]rtMem) int {
	p := h.Plan
	mean := ""
	if p.Rounds == 2 {
		mean = " (with 2 rounds: their mean)"
	}
	fmt.Fprintf(w, "Method: servers, publisher and load tool in separate processes on one machine; two servers per system on one Redis, "+
		"every room's subscribers split over both; %s-byte payloads published at a fixed rate with their send time; "+
		"%gs warm-up, %gs measured per run (ceiling steps: %gs + %gs); cases interleaved over %d round(s), median per figure%s. "+
		"Latency = publish call → event parsed by the load tool. Servers CPU, load tool CPU = getrusage user+system time of both servers, of the load tool, over the run / events received. "+
		"Redis cmds/publish = Δ of summed `INFO commandstats` calls during the run (minus the INFO itself; all clients: servers, publisher, presence) / publishes. "+
		"Go %s, %d CPUs (shared by every process); load average (1, 5, 15 min) %s; Redis %s; %s.\n",
		thousands(payloadSize), p.Warmup, p.Duration, p.CeilingWarmup, p.CeilingDur, p.Rounds, mean,
		h.Go, h.CPUs, h.Load, h.Redis, h.Date.Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(w, "Command: `%s`\n", h.Command)
	if p.Name != fullPlan.Name {
		fmt.Fprintf(w, "\n**Not the method**: the %s plan (a smoke run); do not compare these figures.\n", p.Name)
	}
	var notes []string
	if len(cases) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| case | system (transport) | publishes/s | delivered events/s | p50 ms | p99 ms | max ms | servers CPU µs/event | load tool CPU µs/event | Redis cmds/publish |")
		fmt.Fprintln(w, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, c := range cases {
			for _, s := range systems {
				runs := results[c.Name+"\x00"+s.Name]
				med := func(f func(rtResult) float64) float64 {
					xs := make([]float64, len(runs))
					for i, r := range runs {
						xs[i] = f(r)
					}
					return median(xs)
				}
				name := c.Name
				var probs []string
				for i, r := range runs {
					pr := r.problems()
					if c.Ceiling && r.Lat.P99/1000 > p.CeilingP99 {
						pr = append(pr, fmt.Sprintf("p99 %.1f ms already at the first step", r.Lat.P99/1000))
					}
					if len(pr) > 0 {
						probs = append(probs, fmt.Sprintf("round %d: %s", i+1, strings.Join(pr, "; ")))
					}
				}
				if len(probs) > 0 {
					notes = append(notes, fmt.Sprintf("%s, %s: %s", c.Name, s.Name, strings.Join(probs, "; ")))
					name += fmt.Sprintf(" ⚠ [%d]", len(notes))
				}
				fmt.Fprintf(w, "| %s | %s (%s) | %s | %s | %.2f | %.2f | %.2f | %.1f | %.1f | %.2f |\n",
					name, s.Name, s.Transport,
					thousands(med(func(r rtResult) float64 { return r.Rate })),
					thousands(med(func(r rtResult) float64 { return r.Delivered })),
					med(func(r rtResult) float64 { return r.Lat.P50 / 1000 }),
					med(func(r rtResult) float64 { return r.Lat.P99 / 1000 }),
					med(func(r rtResult) float64 { return r.Lat.Max / 1000 }),
					med(func(r rtResult) float64 { return r.SrvPerEvent }),
					med(func(r rtResult) float64 { return r.CPUPerEvent }),
					med(func(r rtResult) float64 { return r.CmdsPerPub }))
			}
		}
		fmt.Fprintln(w)
		for _, c := range cases {
			if c.Ceiling || c.Rate != 1000 {
				continue
			}
			for _, s := range systems {
				if runs := results[c.Name+"\x00"+s.Name]; len(runs) > 0 {
					fmt.Fprintf(w, "Redis calls per publish, %s, %s (round 1; commands a script runs count as well): %s.\n", c.Name, s.Name, commandBreakdown(runs[0].ByCommand))
				}
			}
			fmt.Fprintln(w)
		}
		fmt.Fprintf(w, "The ceiling row is the last step (of %s publishes/s) whose p99 stayed within %.0f ms with every event delivered, no subscriber dropped and the publisher on rate.\n",
			joinRates(p.CeilingRates), p.CeilingP99)
	}
	if len(memKinds) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintf(w, "Memory per idle stream: %s idle SSE streams (one room each, no user channel) on one server in its own process, "+
			"HeapInuse + StackInuse after two GCs, after minus before, / streams; median over rounds.\n\n", thousands(float64(p.Idle)))
		fmt.Fprintln(w, "| server | per stream | heap | stack | goroutines per stream |")
		fmt.Fprintln(w, "|---|---:|---:|---:|---:|")
		for _, k := range memKinds {
			runs := mem[k]
			med := func(f func(rtMem) float64) float64 {
				xs := make([]float64, len(runs))
				for i, r := range runs {
					xs[i] = f(r)
				}
				return median(xs)
			}
			name := map[string]string{"redisecho": "redisecho (Hub + SSEWithConfig)", "bare": "bare Echo SSE handler"}[k]
			var probs []string
			for i, r := range runs {
				if r.Problem != "" {
					probs = append(probs, fmt.Sprintf("round %d: %s", i+1, r.Problem))
				}
			}
			if len(probs) > 0 {
				notes = append(notes, fmt.Sprintf("memory, %s: %s", k, strings.Join(probs, "; ")))
				name += fmt.Sprintf(" ⚠ [%d]", len(notes))
			}
			fmt.Fprintf(w, "| %s | %.1f KB | %.1f KB | %.1f KB | %.2f |\n", name,
				med(func(r rtMem) float64 { return r.PerStream / 1024 }),
				med(func(r rtMem) float64 { return r.Heap / 1024 }),
				med(func(r rtMem) float64 { return r.Stack / 1024 }),
				med(func(r rtMem) float64 { return r.Goroutines }))
		}
		fmt.Fprintln(w)
		for _, k := range memKinds {
			if b := siteBreakdown(mem[k][0].Sites, 8); b != "" {
				fmt.Fprintf(w, "Heap per stream by allocation site, %s (round 1, sampled profile): %s.\n", k, b)
			}
			var parked []string
			for at, g := range mem[k][0].Parked {
				parked = append(parked, fmt.Sprintf("`%s` %.2f", at, g))
			}
			sort.Strings(parked)
			if len(parked) > 0 {
				fmt.Fprintf(w, "Goroutines per stream by where they wait, %s: %s.\n", k, strings.Join(parked, ", "))
			}
			var retries []string
			for i, r := range mem[k] {
				if r.Retries > 0 {
					retries = append(retries, fmt.Sprintf("round %d: %d", i+1, r.Retries))
				}
			}
			if len(retries) > 0 {
				fmt.Fprintf(w, "Opening the %s streams of %s (32 at a time) got 503 answers, each retried with backoff as the example page does: %s.\n", thousands(float64(p.Idle)), k, strings.Join(retries, ", "))
			}
		}
	}
	if len(notes) > 0 {
		fmt.Fprintln(w)
		for i, n := range notes {
			fmt.Fprintf(w, "[%d] %s\n", i+1, n)
		}
	}
	return len(notes)
}

// commandCalls reads INFO commandstats: calls by command (lower case,
// "|" for subcommands: "client|setinfo"). The INFO call itself is counted
// in the next snapshot.
func commandCalls(c *redisConn) (map[string]int64, error) {
	info, err := c.do("INFO", "commandstats")
	if err != nil {
		return nil, err
	}
	calls := map[string]int64{}
	for _, line := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok || !strings.HasPrefix(name, "cmdstat_") {
			continue
		}
		_, v, ok := strings.Cut(rest, "calls=")
		if !ok {
			return nil, fmt.Errorf("redis: unexpected commandstats line %q", line)
		}
		v, _, _ = strings.Cut(v, ",")
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("redis: unexpected commandstats line %q", line)
		}
		calls[strings.TrimPrefix(name, "cmdstat_")] = n
	}
	return calls, nil
}

// commandBreakdown lists the commands of one run by calls per publish.
func commandBreakdown(by map[string]float64) string {
	type kv struct {
		k string
		v float64
	}
	var all []kv
	for k, v := range by {
		all = append(all, kv{k, v})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].v > all[j].v || all[i].v == all[j].v && all[i].k < all[j].k })
	var parts []string
	var rest float64
	for _, e := range all {
		if e.v >= 0.005 {
			parts = append(parts, fmt.Sprintf("%s %.2f", strings.ToUpper(e.k), e.v))
		} else {
			rest += e.v
		}
	}
	if rest > 0 {
		parts = append(parts, fmt.Sprintf("others %.3f", rest))
	}
	return strings.Join(parts, ", ")
}

// siteBreakdown lists the top n sites by bytes per stream, then the rest.
func siteBreakdown(sites map[string]float64, n int) string {
	type kv struct {
		k string
		v float64
	}
	var all []kv
	for k, v := range sites {
		all = append(all, kv{k, v})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].v > all[j].v })
	var parts []string
	var rest float64
	for i, e := range all {
		if i < n && e.v >= 16 {
			parts = append(parts, fmt.Sprintf("`%s` %.2f KB", e.k, e.v/1024))
		} else {
			rest += e.v
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return strings.Join(parts, ", ") + fmt.Sprintf(", other %.2f KB", rest/1024)
}

// loadAverage is /proc/loadavg's first three fields, "?" where there is
// none: the machine may be shared, and the table should say how busy it
// was.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func joinRates(rates []int) string {
	var s []string
	for _, r := range rates {
		s = append(s, thousands(float64(r)))
	}
	return strings.Join(s, ", ")
}

func realtimeCommandLine() string {
	parts := []string{"cd bench && go run . realtime"}
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "realtime" {
		args = args[1:]
	}
	for _, a := range args {
		if !shellSafe.MatchString(a) {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}
