//go:build linux || darwin || freebsd

package processor

import "syscall"

// mapMem maps n bytes of zeroed, private anonymous memory.
func mapMem(n int) ([]byte, error) {
	return syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
}

// unmapMem returns a mapping from mapMem to the system.
func unmapMem(b []byte) {
	// Munmap fails only for a range that is not a mapping, which
	// offHeap's bookkeeping rules out.
	if err := syscall.Munmap(b); err != nil {
		panic("unmap: " + err.Error())
	}
}
