/// Anything that sits in a snapshot tree by name and parent name.
public protocol SnapshotTreeNode: Sendable {
    var name: String { get }
    var parent: String? { get }
}

extension DiskSnapshot: SnapshotTreeNode {}

/// Tree queries over snapshots (parent, children, roots, leaves, ancestors, descendants).
/// Order is preserved from the input, which the store gives in creation order.
public struct SnapshotTree<Node: SnapshotTreeNode>: Sendable {
    public let nodes: [Node]
    private let byName: [String: Int]
    private let childIndex: [String: [Int]]

    public init(_ nodes: [Node]) {
        self.nodes = nodes
        var byName: [String: Int] = [:]
        var childIndex: [String: [Int]] = [:]
        for (i, node) in nodes.enumerated() {
            byName[node.name] = i
            if let parent = node.parent { childIndex[parent, default: []].append(i) }
        }
        self.byName = byName
        self.childIndex = childIndex
    }

    public subscript(name: String) -> Node? { byName[name].map { nodes[$0] } }

    /// Nodes with no parent (or whose parent is unknown).
    public var roots: [Node] { nodes.filter { $0.parent == nil || byName[$0.parent!] == nil } }

    /// Nodes with no children.
    public var leaves: [Node] { nodes.filter { (childIndex[$0.name] ?? []).isEmpty } }

    /// Direct children of `name`.
    public func children(of name: String) -> [Node] { (childIndex[name] ?? []).map { nodes[$0] } }

    /// All nodes below `name`, parents before children.
    public func descendants(of name: String) -> [Node] {
        var out: [Node] = []
        var queue = children(of: name)
        while !queue.isEmpty {
            let node = queue.removeFirst()
            out.append(node)
            queue.append(contentsOf: children(of: node.name))
        }
        return out
    }

    /// From the parent of `name` up to its root.
    public func ancestors(of name: String) -> [Node] {
        var out: [Node] = []
        var seen: Set<String> = [name]
        var next = self[name]?.parent
        while let parentName = next, let parent = self[parentName], seen.insert(parentName).inserted {
            out.append(parent)
            next = parent.parent
        }
        return out
    }

    /// The tree drawn with box characters, one node a line, `marker` appended to the marked name.
    public func rendered(marking marked: String? = nil, label: (Node) -> String = { $0.name }) -> String {
        var lines: [String] = []
        func walk(_ node: Node, _ prefix: String, _ isLast: Bool, _ isRoot: Bool) {
            let branch = isRoot ? "" : (isLast ? "└─ " : "├─ ")
            let mark = node.name == marked ? "  <- current" : ""
            lines.append(prefix + branch + label(node) + mark)
            let kids = children(of: node.name)
            let childPrefix = isRoot ? prefix : prefix + (isLast ? "   " : "│  ")
            for (i, child) in kids.enumerated() { walk(child, childPrefix, i == kids.count - 1, false) }
        }
        for root in roots { walk(root, "", true, true) }
        return lines.joined(separator: "\n")
    }
}
