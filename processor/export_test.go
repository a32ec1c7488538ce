package processor

// Evaluate runs degradation and volume detection on every segment at the
// current window positions, as a flush does after moving the windows; for
// benchmarks.
func Evaluate(p *Processor) {
	p.sumsMu.Lock()
	defer p.sumsMu.Unlock()
	p.evaluate()
}
