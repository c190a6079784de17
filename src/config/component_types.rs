//! The macro that declares a component kind's config enum, one line per `type`.

/// Declares `$enum`, the config of one component kind, with one variant per `type`, plus
/// its `parse` (by `type`, with an error listing the known types), `type_name` and
/// `spec`/`spec_mut` (the variant as `dyn $trait`). Adding a component type is one line here plus
/// its module.
///
/// A line may start with `#[cfg(...)]` (a type behind a cargo feature): the variant and
/// every match arm and list entry naming it then exist only when the cfg holds, so a
/// build without the feature reports the type as unknown.
macro_rules! component_types {
    (
        $(#[$meta:meta])*
        $enum:ident: dyn $trait:ident, $kind:literal;
        $($(#[cfg($cfg:meta)])? $type_name:literal => $variant:ident($config:ty)),+ $(,)?
    ) => {
        $(#[$meta])*
        // Configs are cold data, a handful per gateway: no boxing for the large ones.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone, PartialEq)]
        pub enum $enum {
            $(
                #[doc = concat!("`type = \"", $type_name, "\"`.")]
                $(#[cfg($cfg)])?
                $variant($config),
            )+
        }

        impl $enum {
            /// Every `type` of this kind.
            pub const TYPES: &'static [&'static str] = &[$($(#[cfg($cfg)])? $type_name),+];

            /// Types one config table by its `type`.
            pub fn parse(
                table: $crate::config::ComponentTable<'_>,
                context: &$crate::config::Context<'_>,
            ) -> Result<Self, $crate::config::ConfigError> {
                match table.type_name.get_ref().as_str() {
                    $($(#[cfg($cfg)])? $type_name => Ok(Self::$variant(table.parse(context)?)),)+
                    _ => Err(table.unknown_type(context, $kind, Self::TYPES)),
                }
            }

            /// The config's `type`.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $($(#[cfg($cfg)])? Self::$variant(_) => $type_name,)+
                }
            }

            /// What every type of this kind offers.
            pub fn spec(&self) -> &dyn $trait {
                match self {
                    $($(#[cfg($cfg)])? Self::$variant(config) => config,)+
                }
            }

            /// What every type of this kind offers, mutably.
            #[allow(dead_code, reason = "only some kinds compare configs field by field")]
            pub fn spec_mut(&mut self) -> &mut dyn $trait {
                match self {
                    $($(#[cfg($cfg)])? Self::$variant(config) => config,)+
                }
            }
        }
    };
}

pub(crate) use component_types;
