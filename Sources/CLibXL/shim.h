// libxenlight (Debian's libxen-dev): the Xen toolstack library the Xen driver drives.
#include <libxl.h>
#include <libxl_utils.h>
#include <xentoollog.h>

// The variadic logger constructor, named for Swift: a logger on stderr at `level`.
static inline xentoollog_logger *vmsnap_xtl_stderr(xentoollog_level level) {
    return (xentoollog_logger *)xtl_createlogger_stdiostream(stderr, level, XTL_STDIOSTREAM_HIDE_PROGRESS);
}
