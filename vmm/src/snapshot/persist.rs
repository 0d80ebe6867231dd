//! Typed save and restore of one component: what a snapshot keeps of it
//! (`State`), what restoring it needs besides that state (`ConstructorArgs`:
//! host resources such as memory, files and eventfds, which a snapshot
//! cannot hold), and how restoring can fail.

pub trait Persist: Sized {
    type State;
    type ConstructorArgs;
    type Error;

    /// What a snapshot keeps of the component.
    fn save(&self) -> Self::State;

    /// Rebuilds the component from saved state in a new VM.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
