package processor

import (
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/funnelwatch/funnelwatch/store"
)

// Evaluate runs degradation and volume detection on every segment at the
// current window positions, as a flush does after moving the windows; for
// benchmarks.
func Evaluate(p *Processor) {
	p.sumsMu.Lock()
	defer p.sumsMu.Unlock()
	p.evaluate()
}

// LoadFilter builds the entity filter, which New leaves to the first batch
// or Run; for benchmarks.
func LoadFilter(p *Processor) { p.loadFilter() }

// MemStore opens a store in memory, closed when the test ends.
func MemStore(t testing.TB) *store.Store {
	t.Helper()
	st, err := store.Open("", store.Options{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}
