//go:build !(linux || darwin || freebsd)

package processor

// mapMem allocates n zeroed bytes on the Go heap where anonymous
// mappings are not available: the entity table then counts in the Go
// heap like everything else.
func mapMem(n int) ([]byte, error) { return make([]byte, n), nil }

// unmapMem leaves b to the collector.
func unmapMem([]byte) {}
