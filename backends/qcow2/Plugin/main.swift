import BackendPluginKit
import Qcow2Backend
import SnapshotCore

// The qcow2 backend as a plug-in executable, under the kind `qcow2-plugin` so it can sit beside
// the built-in one: the Swift plug-in SDK's worked example (docs/backend-authors.md).
try await PluginServer(kind: "qcow2-plugin") { settings in Qcow2Backend(settings: settings) }.run()
