// Command openloop drives one unary gRPC method at a fixed request rate, open loop: call i is
// due at start + i/rate (or after exponential gaps, -poisson) whatever happened to the calls
// before it, and its latency is measured from that due time, not from when it was actually
// sent. A server (or this generator) that falls behind therefore shows its queueing in the
// latencies instead of hiding it by sending less (coordinated omission).
//
// It speaks HTTP/2 itself (golang.org/x/net/http2's framer, no gRPC library): every call is
// the same pre-encoded header block and one DATA frame holding a pre-serialized gRPC message,
// so a call costs the generator little CPU (this machine has 2 cores and the server under
// test shares them). Responses are read frame by frame; a call ends at its trailers, and its
// grpc-status is its result. The generator's own lateness is measured and reported (send lag:
// the time the call was written minus its due time).
//
//	openloop -target 127.0.0.1:50051 -method /allocsvc.v1.Allocator/Allocate \
//	    -body request.bin -rate 2000 -duration 60s -warmup 5s -conns 4
//
// -body is the serialized request message (no gRPC frame). It prints one JSON object on
// stdout: counts, results by gRPC status, achieved rate, latency percentiles (ms, from the due
// time), the send lag's percentiles, the response message sizes seen, and how often a
// connection was replaced after the server's GOAWAY (its calls in flight are answered on it).
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Names of the gRPC status codes, by number.
var codeNames = []string{
	"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
	"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
	"ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
	"UNAUTHENTICATED",
}

// Our receive windows, announced at the start: large enough that a run never needs to
// replenish a stream's, and the connection's is topped up as data arrives.
const window = 1 << 30

// sample is one answered (or failed) call of the measured window.
type sample struct {
	latency time.Duration // end of the call minus its due time
	lag     time.Duration // written minus due time
	code    string        // gRPC status name, or what went wrong
	size    int           // response message bytes (without the 5-byte gRPC prefix)
	due     time.Time
}

// call is a call in flight on a connection.
type call struct {
	due      time.Time
	sent     time.Time
	measured bool
	status   int // HTTP :status of the response headers (0 before they come)
	bytes    int // DATA bytes received
}

// conn is one HTTP/2 connection: the writer side is used by the scheduler, the reader side by
// its own goroutine; both under mu.
type conn struct {
	mu        sync.Mutex
	canSend   *sync.Cond
	nc        net.Conn
	bw        *bufio.Writer
	framer    *http2.Framer
	nextID    uint32
	inflight  map[uint32]*call
	sendWin   int64 // the peer's connection-level window for our DATA
	unacked   int64 // DATA bytes received since our last connection WINDOW_UPDATE
	broken    error
	goaway    bool // the server sent GOAWAY: no new calls here, the ones in flight end
	headers   []byte
	message   []byte
	results   chan<- sample
	unpending func()
}

func dial(target string, headers, message []byte, results chan<- sample, done func()) (*conn, error) {
	nc, err := net.Dial("tcp", target)
	if err != nil {
		return nil, err
	}
	if tcp, ok := nc.(*net.TCPConn); ok {
		_ = tcp.SetNoDelay(true)
	}
	c := &conn{
		nc: nc, bw: bufio.NewWriterSize(nc, 64<<10), nextID: 1, inflight: map[uint32]*call{},
		sendWin: 65535, headers: headers, message: message, results: results, unpending: done,
	}
	c.canSend = sync.NewCond(&c.mu)
	c.framer = http2.NewFramer(c.bw, bufio.NewReaderSize(nc, 64<<10))
	c.framer.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.framer.MaxHeaderListSize = 1 << 20
	if _, err := c.bw.WriteString(http2.ClientPreface); err != nil {
		return nil, err
	}
	err = c.framer.WriteSettings(
		http2.Setting{ID: http2.SettingEnablePush, Val: 0},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: window},
	)
	if err == nil {
		err = c.framer.WriteWindowUpdate(0, window-65535)
	}
	if err == nil {
		err = c.bw.Flush()
	}
	if err != nil {
		return nil, err
	}
	go c.read()
	return c, nil
}

// send writes one call (headers and its one DATA frame); the caller flushes. False: the
// server asked for no more calls on this connection (GOAWAY), nothing was written.
func (c *conn) send(due time.Time, measured bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.broken == nil && !c.goaway && c.sendWin < int64(len(c.message)) {
		c.canSend.Wait()
	}
	if c.goaway {
		return false
	}
	id := c.nextID
	c.nextID += 2
	k := &call{due: due, measured: measured}
	if c.broken != nil {
		c.finish(k, "CONNECTION_BROKEN", 0)
		return true
	}
	c.inflight[id] = k
	err := c.framer.WriteHeaders(http2.HeadersFrameParam{
		StreamID: id, BlockFragment: c.headers, EndHeaders: true,
	})
	if err == nil {
		err = c.framer.WriteData(id, true, c.message)
	}
	c.sendWin -= int64(len(c.message))
	k.sent = time.Now()
	if err != nil {
		c.fail(err)
	}
	return true
}

func (c *conn) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken == nil {
		if err := c.bw.Flush(); err != nil {
			c.fail(err)
		}
	}
}

// finish reports a call's end (mu held).
func (c *conn) finish(k *call, code string, size int) {
	if k.measured {
		end := time.Now()
		c.results <- sample{
			latency: end.Sub(k.due), lag: k.sent.Sub(k.due), code: code, size: size, due: k.due,
		}
	}
	c.unpending()
}

// fail ends every call in flight (mu held).
func (c *conn) fail(err error) {
	if c.broken == nil {
		c.broken = err
		fmt.Fprintln(os.Stderr, "openloop: connection:", err)
	}
	for id, k := range c.inflight {
		c.finish(k, "CONNECTION_BROKEN", 0)
		delete(c.inflight, id)
	}
	c.canSend.Broadcast()
}

func (c *conn) read() {
	for {
		frame, err := c.framer.ReadFrame()
		c.mu.Lock()
		if err != nil {
			if c.broken == nil && c.goaway && len(c.inflight) == 0 {
				// Closed by the server after a GOAWAY, every call answered.
				c.broken = err
			} else if c.broken == nil {
				c.fail(err)
			}
			c.mu.Unlock()
			return
		}
		c.handle(frame)
		c.mu.Unlock()
	}
}

// handle one frame (mu held).
func (c *conn) handle(frame http2.Frame) {
	switch f := frame.(type) {
	case *http2.SettingsFrame:
		if !f.IsAck() {
			_ = f.ForeachSetting(func(s http2.Setting) error {
				if s.ID == http2.SettingInitialWindowSize && s.Val < 1<<16 {
					// Every call fits a fresh stream's window of the default size; a
					// smaller one is not handled here.
					c.fail(fmt.Errorf("peer's initial stream window %d is too small", s.Val))
				}
				return nil
			})
			_ = c.framer.WriteSettingsAck()
			_ = c.bw.Flush()
		}
	case *http2.PingFrame:
		if !f.IsAck() {
			_ = c.framer.WritePing(true, f.Data)
			_ = c.bw.Flush()
		}
	case *http2.WindowUpdateFrame:
		if f.StreamID == 0 {
			c.sendWin += int64(f.Increment)
			c.canSend.Broadcast()
		}
	case *http2.DataFrame:
		if k := c.inflight[f.StreamID]; k != nil {
			k.bytes += len(f.Data())
		}
		c.unacked += int64(len(f.Data()))
		if c.unacked > window/2 {
			_ = c.framer.WriteWindowUpdate(0, uint32(c.unacked))
			_ = c.bw.Flush()
			c.unacked = 0
		}
	case *http2.MetaHeadersFrame:
		k := c.inflight[f.StreamID]
		if k == nil {
			return
		}
		if s := f.PseudoValue("status"); s != "" {
			k.status, _ = strconv.Atoi(s)
		}
		if !f.StreamEnded() {
			return
		}
		delete(c.inflight, f.StreamID)
		code := "NO_GRPC_STATUS"
		if k.status != 200 {
			code = fmt.Sprintf("HTTP_%d", k.status)
		} else if v := grpcStatus(f); v != "" {
			n, err := strconv.Atoi(v)
			if err == nil && n >= 0 && n < len(codeNames) {
				code = codeNames[n]
			} else {
				code = "GRPC_STATUS_" + v
			}
		}
		c.finish(k, code, max(0, k.bytes-5))
	case *http2.RSTStreamFrame:
		if k := c.inflight[f.StreamID]; k != nil {
			delete(c.inflight, f.StreamID)
			c.finish(k, "RST_STREAM_"+f.ErrCode.String(), 0)
		}
	case *http2.GoAwayFrame:
		if f.ErrCode != http2.ErrCodeNo {
			c.fail(errors.New("GOAWAY " + f.ErrCode.String()))
			return
		}
		// A graceful GOAWAY (gRPC's max connection age, or the server stopping): the calls up
		// to LastStreamID are answered here, later ones were not taken (a gRPC client would
		// retry them; gRPC announces with LastStreamID 2^31-1 first, so normally there are
		// none). New calls go to a new connection (see main).
		c.goaway = true
		for id, k := range c.inflight {
			if id > f.LastStreamID {
				delete(c.inflight, id)
				c.finish(k, "REFUSED_BY_GOAWAY", 0)
			}
		}
		c.canSend.Broadcast()
	}
}

func grpcStatus(f *http2.MetaHeadersFrame) string {
	for _, h := range f.RegularFields() {
		if h.Name == "grpc-status" {
			return h.Value
		}
	}
	return ""
}

// headerBlock encodes the request headers so that decoding them leaves the peer's HPACK table
// as it was (literals never indexed): the same bytes serve every call.
func headerBlock(target, method string) []byte {
	var buf []byte
	w := &sliceWriter{&buf}
	enc := hpack.NewEncoder(w)
	for _, kv := range [][2]string{
		{":method", "POST"}, {":scheme", "http"}, {":path", method}, {":authority", target},
		{"content-type", "application/grpc"}, {"te", "trailers"},
	} {
		_ = enc.WriteField(hpack.HeaderField{Name: kv[0], Value: kv[1], Sensitive: true})
	}
	return buf
}

type sliceWriter struct{ b *[]byte }

func (s *sliceWriter) Write(p []byte) (int, error) {
	*s.b = append(*s.b, p...)
	return len(p), nil
}

func percentile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := max(0, int(math.Ceil(q*float64(len(sorted))))-1)
	return sorted[i]
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

func main() {
	target := flag.String("target", "127.0.0.1:50051", "host:port")
	method := flag.String("method", "/allocsvc.v1.Allocator/Allocate", "full method name")
	bodyPath := flag.String("body", "", "file with the serialized request message (no gRPC frame)")
	rate := flag.Float64("rate", 1000, "calls per second, over all connections")
	duration := flag.Duration("duration", 10*time.Second, "measured window")
	warmup := flag.Duration("warmup", 2*time.Second, "at the same rate before the window, not measured")
	conns := flag.Int("conns", 4, "HTTP/2 connections; calls are spread round robin")
	poisson := flag.Bool("poisson", false, "exponential gaps (Poisson arrivals) instead of even ones")
	timeout := flag.Duration("timeout", 10*time.Second, "calls still unanswered this long after "+
		"the last one was due count as UNANSWERED")
	procs := flag.Int("procs", 1, "GOMAXPROCS: OS threads running Go code at once")
	gcPercent := flag.Int("gc-percent", 400, "GOGC")
	seriesPath := flag.String("series", "", "optional file: one line per measured call, "+
		"'due (Unix ns)<TAB>latency (ns)<TAB>result<TAB>send lag (ns)'")
	flag.Parse()
	runtime.GOMAXPROCS(*procs)
	debug.SetGCPercent(*gcPercent)
	if *bodyPath == "" || *rate <= 0 || *conns < 1 {
		fmt.Fprintln(os.Stderr, "openloop: -body, a positive -rate and -conns >= 1 are needed")
		os.Exit(2)
	}
	body, err := os.ReadFile(*bodyPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "openloop:", err)
		os.Exit(2)
	}
	message := make([]byte, 5+len(body))
	binary.BigEndian.PutUint32(message[1:5], uint32(len(body)))
	copy(message[5:], body)
	headers := headerBlock(*target, *method)

	expected := int(*rate*duration.Seconds()) + 16
	results := make(chan sample, expected)
	var pending sync.WaitGroup
	clients := make([]*conn, *conns)
	for i := range clients {
		clients[i], err = dial(*target, headers, message, results, pending.Done)
		if err != nil {
			fmt.Fprintln(os.Stderr, "openloop:", err)
			os.Exit(1)
		}
	}

	rng := rand.New(rand.NewSource(1))
	start := time.Now()
	measureFrom := start.Add(*warmup)
	end := measureFrom.Add(*duration)
	gap := float64(time.Second) / *rate
	due := start
	dirty := make([]bool, len(clients))
	sent, reconnects := 0, 0
	for i := 0; ; i++ {
		if *poisson {
			due = due.Add(time.Duration(rng.ExpFloat64() * gap))
		} else {
			due = start.Add(time.Duration(float64(i) * gap))
		}
		if !due.Before(end) {
			break
		}
		if wait := time.Until(due); wait > 0 {
			// Calls written but not yet flushed go out before sleeping.
			for j, d := range dirty {
				if d {
					clients[j].flush()
					dirty[j] = false
				}
			}
			time.Sleep(wait)
		}
		measured := !due.Before(measureFrom)
		if measured {
			sent++
		}
		j := i % len(clients)
		pending.Add(1)
		for !clients[j].send(due, measured) {
			// GOAWAY: what was written goes out, and this call and the next ones of this
			// slot go to a new connection (the kernel may give it to another worker).
			clients[j].flush()
			clients[j], err = dial(*target, headers, message, results, pending.Done)
			if err != nil {
				fmt.Fprintln(os.Stderr, "openloop: reconnecting:", err)
				os.Exit(1)
			}
			reconnects++
		}
		dirty[j] = true
	}
	for j, d := range dirty {
		if d {
			clients[j].flush()
		}
	}
	answered := make(chan struct{})
	go func() { pending.Wait(); close(answered) }()
	select {
	case <-answered:
	case <-time.After(*timeout):
	}
	elapsed := time.Since(measureFrom)
	close(results)

	codes := map[string]int{}
	sizes := map[string]int{}
	var lat, lag []float64
	var series *bufio.Writer
	if *seriesPath != "" {
		f, err := os.Create(*seriesPath)
		if err != nil {
			fmt.Fprintln(os.Stderr, "openloop:", err)
			os.Exit(2)
		}
		defer f.Close()
		series = bufio.NewWriter(f)
		defer series.Flush()
	}
	for s := range results {
		if series != nil {
			fmt.Fprintf(series, "%d\t%d\t%s\t%d\n",
				s.due.UnixNano(), s.latency.Nanoseconds(), s.code, s.lag.Nanoseconds())
		}
		codes[s.code]++
		lag = append(lag, ms(s.lag))
		if s.code == "OK" {
			lat = append(lat, ms(s.latency))
			sizes[strconv.Itoa(s.size)]++
		}
	}
	if missing := sent - len(lag); missing > 0 {
		codes["UNANSWERED"] += missing
	}
	sort.Float64s(lat)
	sort.Float64s(lag)
	out := map[string]any{
		"rate_asked":     *rate,
		"conns":          *conns,
		"poisson":        *poisson,
		"window_s":       duration.Seconds(),
		"sent":           sent,
		"reconnects":     reconnects,
		"codes":          codes,
		"response_sizes": sizes,
		// Answered calls due in the window over the time until the last of them ended.
		"rps":        float64(len(lat)) / elapsed.Seconds(),
		"p50_ms":     percentile(lat, 0.50),
		"p90_ms":     percentile(lat, 0.90),
		"p95_ms":     percentile(lat, 0.95),
		"p99_ms":     percentile(lat, 0.99),
		"p999_ms":    percentile(lat, 0.999),
		"max_ms":     percentile(lat, 1),
		"lag_p50_ms": percentile(lag, 0.50),
		"lag_p99_ms": percentile(lag, 0.99),
		"lag_max_ms": percentile(lag, 1),
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "openloop:", err)
		os.Exit(1)
	}
}
